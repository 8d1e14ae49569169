"""SQLAlchemy models: resources, their sparse embeddings, categories and classifications."""

from __future__ import annotations

from sqlalchemy import JSON, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class Resource(Base):
    __tablename__ = "resources"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    title: Mapped[str] = mapped_column(String(500))
    content: Mapped[str] = mapped_column(Text, default="")

    sparse_embedding: Mapped[ResourceSparseEmbedding | None] = relationship(
        back_populates="resource", cascade="all, delete-orphan", uselist=False
    )
    classifications: Mapped[list[ResourceClassification]] = relationship(
        back_populates="resource", cascade="all, delete-orphan", order_by="ResourceClassification.rank"
    )

    @property
    def text(self) -> str:
        """What the models see: the title, then the content."""
        return f"{self.title}\n{self.content}" if self.content else self.title


class ResourceSparseEmbedding(Base):
    __tablename__ = "resource_sparse_embeddings"

    resource_id: Mapped[int] = mapped_column(ForeignKey("resources.id"), primary_key=True)
    #: token -> lexical weight, as BGE-M3 returns it.
    weights: Mapped[dict[str, float]] = mapped_column(JSON)
    model_name: Mapped[str] = mapped_column(String(200))

    resource: Mapped[Resource] = relationship(back_populates="sparse_embedding")


class Category(Base):
    __tablename__ = "categories"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)


class ResourceClassification(Base):
    __tablename__ = "resource_classifications"
    __table_args__ = (UniqueConstraint("resource_id", "rank"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    resource_id: Mapped[int] = mapped_column(ForeignKey("resources.id"))
    category_id: Mapped[int] = mapped_column(ForeignKey("categories.id"))
    confidence: Mapped[float] = mapped_column(Float)
    rank: Mapped[int] = mapped_column(Integer)
    model_version: Mapped[str] = mapped_column(String(200))

    resource: Mapped[Resource] = relationship(back_populates="classifications")
    category: Mapped[Category] = relationship()
