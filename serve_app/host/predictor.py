"""Task-specific input checks and predictions of loaded models.

Five tasks, each a `Predictor`:

- `tabular-classification`: rows of numbers -> one score in [0, 1] per row;
- `text-classification`: texts -> `{"label", "score", "scores"}` per text;
- `text-embedding`: texts -> one vector per text (mean pooling, optionally normalised);
- `image-classification`: images (encoded bytes or uint8 `[H, W, 3]` arrays) ->
  `{"label", "score", "scores"}` per image, `scores` holding the top-k labels, best first;
- `image-embedding`: images -> one vector per image: the features an image classifier's
  head sees (pooled, optionally normalised).

`validate_inputs()` needs only the manifest, so the ingress rejects bad input (422/400)
before a model is routed to or loaded.
"""

from __future__ import annotations

import itertools
import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

from serve_app.errors import EmptyInputs, InvalidInput, ModelLoadFailed
from serve_app.loading.architectures import input_width
from serve_app.loading.tokenizer_shelf import TokenizerLease
from serve_app.storage.manifest import IMAGE_TASKS, Manifest
from serve_app.vision.images import MAX_IMAGE_PIXELS, check_images, decode_rgb
from serve_app.vision.processing import DEFAULT_TOP_K, ImageProcessing

MAX_TEXT_CHARS = 100_000
# NOTE: features assumed for a tabular model whose manifest does not give its input width.
UNKNOWN_WIDTH_FEATURES = 1024


def element_limit(manifest: Manifest, max_rows: int) -> int:
    """The most values one call's inputs may hold for `manifest`: `max_rows` rows
    (`ingress.max_batch_rows`) of the model's input width (one text per row for text
    models). The HTTP layer bounds request bodies by it before it decodes them.

    Image models take encoded files (one element each) or raw UINT8 `[N, H, W, 3]`
    tensors: those may hold as many values as one image of the largest size the image
    checks accept (`MAX_IMAGE_PIXELS` RGB pixels); `ingress.max_body_bytes` binds first
    at the default limits."""
    if manifest.task == "tabular-classification":
        return max_rows * (input_width(manifest.architecture) or UNKNOWN_WIDTH_FEATURES)
    if manifest.task in IMAGE_TASKS:
        return max(max_rows, 3 * MAX_IMAGE_PIXELS)
    return max_rows


def validate_inputs(manifest: Manifest, inputs: Any, max_rows: int) -> list[Any]:
    """Check that `inputs` fit the model's task; return them as a list.

    Raises:
        EmptyInputs: `inputs` is an empty list (400).
        InvalidInput: wrong type or shape for this model (422).
    """
    if not isinstance(inputs, list):
        raise InvalidInput(f"inputs must be a list, got {type(inputs).__name__}")
    if not inputs:
        raise EmptyInputs("inputs is empty: send at least one row or text")
    if len(inputs) > max_rows:
        raise InvalidInput(f"{len(inputs)} inputs in one call; the limit is {max_rows}")
    if manifest.task in IMAGE_TASKS:
        return list(check_images(inputs, manifest.model_id))
    if manifest.task == "tabular-classification":
        width = input_width(manifest.architecture)
        for i, row in enumerate(inputs):
            if not isinstance(row, list) or not all(_is_number(v) for v in row):
                raise InvalidInput(
                    f"inputs[{i}] must be a list of finite numbers for {manifest.model_id}"
                )
            if width is not None and len(row) != width:
                raise InvalidInput(
                    f"inputs[{i}] has {len(row)} features; {manifest.model_id} expects {width}"
                )
    else:
        for i, text in enumerate(inputs):
            if not isinstance(text, str):
                raise InvalidInput(
                    f"inputs[{i}] must be a string for {manifest.model_id} ({manifest.task})"
                )
            if len(text) > MAX_TEXT_CHARS:
                raise InvalidInput(f"inputs[{i}] is longer than {MAX_TEXT_CHARS} characters")
    return inputs


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def measure_module_bytes(module: nn.Module) -> int:
    """Bytes of the distinct tensor storages a module holds (parameters and buffers)."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        storage = tensor.untyped_storage()
        ident = (str(tensor.device), storage.data_ptr())
        if ident in seen:
            continue
        seen.add(ident)
        total += storage.nbytes()
    return total


class Predictor(ABC):
    """A loaded model version on its device, ready to predict; owned by the cache."""

    task: ClassVar[str]
    batch_size: ClassVar[int] = 64

    def __init__(self, manifest: Manifest, module: nn.Module, device: torch.device) -> None:
        self.manifest = manifest
        self.device = device
        self.module: nn.Module | None = module.eval()
        self._nbytes = measure_module_bytes(module)

    @property
    def nbytes(self) -> int:
        """Measured bytes on the device."""
        return self._nbytes

    def predict(self, inputs: list[Any]) -> list[Any]:
        """Predict for validated inputs, in mini-batches."""
        if self.module is None:
            raise RuntimeError(f"{self.manifest.key} was closed")
        outputs: list[Any] = []
        with torch.inference_mode():
            for start in range(0, len(inputs), self.batch_size):
                outputs.extend(self._predict_batch(inputs[start : start + self.batch_size]))
        return outputs

    @abstractmethod
    def _predict_batch(self, batch: list[Any]) -> list[Any]: ...

    def close(self) -> None:
        """Free the module's tensors now; empties the CUDA cache on GPU.

        NOTE: no gc.collect() here. A full collection in a replica (torch, transformers and
        Ray loaded: ~400k objects) holds the GIL for ~170 ms, and evictions run on the
        replica's event loop, so every eviction stalled all warm requests (B7's p99 tail).
        Swapping each parameter and buffer for an empty tensor drops the storages at once,
        even if something still holds the module or a reference cycle does.
        """
        module, self.module = self.module, None
        if module is not None:
            release_tensors(module)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def release_tensors(module: nn.Module) -> None:
    """Point every parameter and buffer of `module` at an empty tensor, so their storage
    (device memory, or the mmap'd weight buffers they view) is released now."""
    with torch.no_grad():
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)


class TabularClassifier(Predictor):
    """Rows of features -> sigmoid score of the first output."""

    task = "tabular-classification"
    batch_size = 4096

    def _predict_batch(self, batch: list[Any]) -> list[Any]:
        assert self.module is not None
        dtype = next(self.module.parameters()).dtype
        x = torch.tensor(batch, dtype=dtype, device=self.device)
        logits = self.module(x)
        return torch.sigmoid(logits[:, 0]).float().cpu().tolist()


class _TextPredictor(Predictor):
    """A text model; its tokenizer is a lease on a `SharedTokenizer` (the loader's shelf
    hands models with the same tokenizer files one object, and one lock with it: HF fast
    tokenizers are not thread-safe and a replica runs several predicts at once). A plain
    tokenizer gets a lease of its own."""

    def __init__(
        self,
        manifest: Manifest,
        module: nn.Module,
        device: torch.device,
        tokenizer: TokenizerLease | Any,
    ) -> None:
        super().__init__(manifest, module, device)
        if not isinstance(tokenizer, TokenizerLease):
            tokenizer = TokenizerLease.unshared(tokenizer)
        self.tokenizer: TokenizerLease | None = tokenizer
        limit = getattr(getattr(module, "config", None), "max_position_embeddings", 512)
        self.max_length = min(int(limit), 512)

    def _encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        tokenizer = self.tokenizer
        if tokenizer is None:
            raise RuntimeError(f"{self.manifest.key} was closed")
        enc = tokenizer.encode(texts, self.max_length)
        return {k: v.to(self.device) for k, v in enc.items()}

    def close(self) -> None:
        """Release the tokenizer (another model may still use it; the shelf keeps it) and
        free the module."""
        tokenizer, self.tokenizer = self.tokenizer, None
        if tokenizer is not None:
            tokenizer.release()
        super().close()


class TextClassifier(_TextPredictor):
    """Texts -> label with the highest softmax score, and all label scores."""

    task = "text-classification"

    def _predict_batch(self, batch: list[Any]) -> list[Any]:
        assert self.module is not None
        logits = self.module(**self._encode(batch)).logits
        probs = torch.softmax(logits.float(), dim=-1).cpu()
        id2label = self.module.config.id2label
        out = []
        for row in probs:
            scores = {str(id2label[i]): float(p) for i, p in enumerate(row)}
            best = int(row.argmax())
            out.append({"label": str(id2label[best]), "score": float(row[best]), "scores": scores})
        return out


class TextEmbedder(_TextPredictor):
    """Texts -> mean-pooled (and, by default, L2-normalised) embedding vectors."""

    task = "text-embedding"

    def _predict_batch(self, batch: list[Any]) -> list[Any]:
        assert self.module is not None
        enc = self._encode(batch)
        hidden = self.module(**enc).last_hidden_state
        vectors = mean_pool(hidden, enc["attention_mask"])
        if self.manifest.task_options.get("normalize", True):
            vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
        return vectors.float().cpu().tolist()


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of token vectors, padding excluded (sentence-transformers' mean pooling)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


class _ImagePredictor(Predictor):
    """Each batch is decoded (with the size and mode checks again: a handle caller is not
    trusted either) and preprocessed with the model's own settings in the predict thread,
    off the event loop; then one forward pass."""

    batch_size = 32

    def __init__(
        self,
        manifest: Manifest,
        module: nn.Module,
        device: torch.device,
        processing: ImageProcessing,
    ) -> None:
        super().__init__(manifest, module, device)
        self.processing = processing

    def predict(self, inputs: list[Any]) -> list[Any]:
        """Classify images, in mini-batches; a bad image's error names its index."""
        if self.module is None:
            raise RuntimeError(f"{self.manifest.key} was closed")
        outputs: list[Any] = []
        with torch.inference_mode():
            for start in range(0, len(inputs), self.batch_size):
                outputs.extend(self._classify(inputs[start : start + self.batch_size], start))
        return outputs

    def _predict_batch(self, batch: list[Any]) -> list[Any]:
        return self._classify(batch, 0)

    def _classify(self, batch: list[Any], start: int) -> list[Any]:
        assert self.module is not None
        images = (decode_rgb(item, start + i) for i, item in enumerate(batch))
        pixels = torch.from_numpy(self.processing.pixel_values(images))
        dtype = next(self.module.parameters()).dtype
        return self._answer(self.module(pixel_values=pixels.to(self.device, dtype)).logits)

    @abstractmethod
    def _answer(self, logits: torch.Tensor) -> list[Any]: ...


class ImageClassifier(_ImagePredictor):
    """Images -> the top-k labels by softmax score (`task_options.top_k`, default 5)."""

    task = "image-classification"

    def __init__(
        self,
        manifest: Manifest,
        module: nn.Module,
        device: torch.device,
        processing: ImageProcessing,
    ) -> None:
        super().__init__(manifest, module, device, processing)
        labels = len(getattr(module.config, "id2label", {}) or {}) or 1
        self.top_k = max(1, min(int(manifest.task_options.get("top_k", DEFAULT_TOP_K)), labels))

    def _answer(self, logits: torch.Tensor) -> list[Any]:
        assert self.module is not None
        probs = torch.softmax(logits.float(), dim=-1)
        top = torch.topk(probs, self.top_k, dim=-1)
        scores, indices = top.values.cpu().tolist(), top.indices.cpu().tolist()
        id2label = self.module.config.id2label
        out = []
        for row_scores, row_indices in zip(scores, indices, strict=True):
            ranked = {
                str(id2label[i]): float(p) for i, p in zip(row_indices, row_scores, strict=True)
            }
            out.append(
                {"label": str(id2label[row_indices[0]]), "score": row_scores[0], "scores": ranked}
            )
        return out


class ImageEmbedder(_ImagePredictor):
    """Images -> the features an image classifier's head would see (ViT: the normalised
    [CLS] token; ResNet, ConvNeXt: the pooled last stage), L2-normalised unless
    `task_options.normalize` is false. The head itself is dropped at load."""

    task = "image-embedding"

    def __init__(
        self,
        manifest: Manifest,
        module: nn.Module,
        device: torch.device,
        processing: ImageProcessing,
    ) -> None:
        if not isinstance(getattr(module, "classifier", None), nn.Module):
            raise ModelLoadFailed(
                f"{manifest.key}: image-embedding needs an image classifier with a "
                "`classifier` head (its input is the embedding)"
            )
        module.classifier = nn.Identity()
        super().__init__(manifest, module, device, processing)

    def _answer(self, logits: torch.Tensor) -> list[Any]:
        vectors = logits.flatten(1).float()
        if self.manifest.task_options.get("normalize", True):
            vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
        return vectors.cpu().tolist()


PREDICTORS: dict[str, type[Predictor]] = {
    cls.task: cls
    for cls in (TabularClassifier, TextClassifier, TextEmbedder, ImageClassifier, ImageEmbedder)
}
