"""The loading seam: model directory in, ``LoadedModel(model, tokenizer, device)`` out.

torch, transformers and FlagEmbedding are imported here, inside the functions, so that
importing the services (or constructing them) costs nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NamedTuple

from app.ml.errors import ModelUnavailableError
from app.ml.resolver import CLASSIFICATION, RERANK, SPARSE_EMBEDDING, ModelSource, resolve_model_path


class LoadedModel(NamedTuple):
    model: Any
    tokenizer: Any
    device: str


def select_device(device: str | None = None, dtype: str | None = None) -> str:
    """``device`` if given, else CUDA where available, else CPU; int8 (dynamic) runs on CPU only."""
    if dtype == "int8":
        if device and device != "cpu":
            raise ValueError(f"dynamic int8 quantization runs on the CPU, not {device}")
        return "cpu"
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def use_fp16(device: str, dtype: str | None) -> bool:
    """fp16 on CUDA unless fp32 is asked for; never on CPU."""
    return device.startswith("cuda") and dtype != "fp32"


def _checked_path(source: ModelSource, path: str | Path | None) -> Path:
    path = Path(path) if path is not None else resolve_model_path(source)
    if not path.is_dir():
        raise ModelUnavailableError(source.name, [f"{path}: no such directory"])
    missing = source.missing_files(path)
    if missing:
        raise ModelUnavailableError(source.name, [f"{path}: missing {', '.join(missing)}"])
    return path


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def load_sparse_embedding_model(
    path: str | Path | None = None, device: str | None = None, dtype: str | None = None
) -> LoadedModel:
    """BGE-M3 through FlagEmbedding's ``BGEM3FlagModel`` from a local directory."""
    path = _checked_path(SPARSE_EMBEDDING, path)
    device = select_device(device, dtype)
    try:
        _quiet_transformers()
        from FlagEmbedding import BGEM3FlagModel

        model = BGEM3FlagModel(
            str(path), use_fp16=use_fp16(device, dtype), devices=device, trust_remote_code=False
        )
        if device == "cpu":
            _map_heads(model.model, path)
        # FlagEmbedding moves the model to its device, and leaves its heads in training mode, until the first encode.
        model.model.to(model.target_devices[0]).eval()
        if dtype == "int8":
            model.model = quantize_dynamic_int8(model.model)
    except Exception as exc:
        raise ModelUnavailableError(SPARSE_EMBEDDING.name, [f"{path}: {type(exc).__name__}: {exc}"]) from exc
    return LoadedModel(model, model.tokenizer, device)


def _map_heads(module, path: Path) -> None:
    """Map BGE-M3's sparse and ColBERT heads from their files, copy on write, like the safetensors weights.

    FlagEmbedding reads them into memory; mapped, they share the page cache between processes, and
    a write to them shows as a page of the process's own (which the tests' sharing check relies on).
    """
    import torch

    for name in ("colbert_linear", "sparse_linear"):
        state = torch.load(path / f"{name}.pt", map_location="cpu", weights_only=True, mmap=True)
        getattr(module, name).load_state_dict(state, assign=True)


def load_classification_model(
    path: str | Path | None = None, device: str | None = None, dtype: str | None = None
) -> LoadedModel:
    """A fine-tuned sequence classifier through transformers' Auto classes."""
    path = _checked_path(CLASSIFICATION, path)
    device = select_device(device, dtype)
    try:
        import torch

        _quiet_transformers()
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            trust_remote_code=False,
            local_files_only=True,
            dtype=torch.float16 if use_fp16(device, dtype) else torch.float32,
        )
        model.to(device).eval()
        if dtype == "int8":
            model = quantize_dynamic_int8(model)
    except Exception as exc:
        raise ModelUnavailableError(CLASSIFICATION.name, [f"{path}: {type(exc).__name__}: {exc}"]) from exc
    return LoadedModel(model, tokenizer, device)


def load_rerank_model(path: str | Path | None = None, device: str | None = None, dtype: str | None = None) -> LoadedModel:
    """A cross-encoder reranker through FlagEmbedding's ``FlagReranker`` from a local directory."""
    path = _checked_path(RERANK, path)
    device = select_device(device, dtype)
    try:
        _quiet_transformers()
        from FlagEmbedding import FlagReranker

        model = FlagReranker(str(path), use_fp16=use_fp16(device, dtype), devices=device, trust_remote_code=False)
        model.model.to(device).eval()
        if dtype == "int8":
            model.model = quantize_dynamic_int8(model.model)
    except Exception as exc:
        raise ModelUnavailableError(RERANK.name, [f"{path}: {type(exc).__name__}: {exc}"]) from exc
    return LoadedModel(model, model.tokenizer, device)


def quantize_dynamic_int8(module):
    """Dynamic int8 quantization of the linear layers, for CPU inference.

    ``torch.ao.quantization.quantize_dynamic`` of the pinned torch (2.13). It warns that it is
    deprecated in favour of torchao, but torchao 0.18's ``Int8DynamicActivationInt8WeightConfig``
    has no fast CPU kernel (27x slower than fp32 here), while this is faster than fp32.
    """
    import warnings

    import torch
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        # In place: the fresh load is not needed unquantized, and its other weights stay mapped from the file.
        # eval(): the new layers come in training mode.
        return quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8, inplace=True).eval()


def inference_context():
    """``torch.inference_mode()`` where torch is in use; a torch model implies torch is imported."""
    torch = sys.modules.get("torch")
    if torch is None:
        import contextlib

        return contextlib.nullcontext()
    return torch.inference_mode()
