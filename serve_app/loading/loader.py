"""The loader: a manifest -> verified buffers (disk tier or S3) -> a Predictor on the device.

Artifacts are safetensors only. Hugging Face directories load with
`from_pretrained(local_files_only=True, trust_remote_code=False, use_safetensors=True)`;
torch modules are built from the manifest's architecture on the meta device and adopt the
weights with `load_state_dict(assign=True)`, so no random init runs and nothing is pickled.
"""

from __future__ import annotations

import logging
import mmap
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch

from serve_app.config import HostConfig
from serve_app.errors import ArtifactCorrupt, ModelLoadFailed
from serve_app.host.predictor import PREDICTORS, Predictor
from serve_app.loading.architectures import build_module
from serve_app.loading.disk_tier import DiskTier
from serve_app.loading.ram_tier import RamTier
from serve_app.loading.staging import HostToDevice
from serve_app.loading.tensorfile import tensors_from_buffer
from serve_app.loading.tokenizer_shelf import TokenizerLease, TokenizerShelf, tokenizer_key
from serve_app.storage.fetch import Buffer
from serve_app.storage.manifest import IMAGE_TASKS, Manifest
from serve_app.storage.store import ModelStore
from serve_app.vision.processing import ImageProcessing

logger = logging.getLogger(__name__)

DEFAULT_CPU_BUDGET = 2 * 2**30


def resolve_device(accelerator: str) -> torch.device:
    """`cuda` when asked for (or `auto` and a GPU is visible), else `cpu`."""
    if accelerator == "cuda" or (accelerator == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("accelerator: cuda, but torch sees no CUDA device")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def memory_budget(config: HostConfig, device: torch.device) -> int:
    """The replica's byte budget: configured bytes, else a share of GPU memory, else 2 GiB."""
    if config.memory_budget is not None:
        return config.memory_budget
    if device.type == "cuda":
        _, total = torch.cuda.mem_get_info(device)
        return int(total * config.gpu_memory_fraction)
    return DEFAULT_CPU_BUDGET


class ModelLoader:
    """Loads model versions from the store onto one device (blocking; call from a thread)."""

    def __init__(
        self,
        store: ModelStore,
        disk: DiskTier,
        device: torch.device,
        owns_disk: bool = False,
        ram: RamTier | None = None,
        tokenizers: TokenizerShelf | None = None,
    ) -> None:
        self.store = store
        self.disk = disk
        self.ram = ram
        self.device = device
        self.owns_disk = owns_disk
        # NOTE: one shelf per loader (per host replica): models whose tokenizer files have
        # the same digests share one tokenizer, built once.
        self.tokenizers = tokenizers if tokenizers is not None else TokenizerShelf()
        # NOTE: pinned staging buffers are allocated once per replica, not per load.
        self._h2d = HostToDevice(device) if device.type == "cuda" else None
        # NOTE: importing transformers takes seconds; pay it at replica start, not in the
        # first cold request.
        import transformers

        transformers.utils.logging.disable_progress_bar()

    @classmethod
    def from_config(
        cls, store: ModelStore, config: HostConfig, device: torch.device
    ) -> ModelLoader:
        """A loader with the disk tier the host config names (or a private temp folder) and
        the host-RAM tier if `ram_cache_bytes` is set."""
        ram = RamTier(config.ram_cache_bytes) if config.ram_cache_bytes else None
        if config.disk_cache_dir:
            disk = DiskTier(Path(config.disk_cache_dir), config.disk_cache_bytes)
            return cls(store, disk, device, ram=ram)
        root = Path(tempfile.mkdtemp(prefix="fleetserve-disk-"))
        return cls(store, DiskTier(root, config.disk_cache_bytes), device, owns_disk=True, ram=ram)

    def close(self) -> None:
        """Remove the disk tier if it is this loader's private temp folder."""
        if self.owns_disk:
            shutil.rmtree(self.disk.root, ignore_errors=True)

    def has_local_copy(self, manifest: Manifest) -> bool:
        """Whether the RAM or disk tier holds every file of this version (by size: the
        load verifies the sha256, and falls back to the store on a mismatch)."""
        if self.ram is not None and manifest.key in self.ram:
            return True
        return self.disk.has(manifest)

    def load(self, manifest: Manifest, limit_bytes: int | None = None) -> Predictor:
        """Fetch, verify and build `manifest`'s model on the device.

        From the host-RAM tier when it holds the version (verified buffers still in memory:
        on a GPU a reload is one host-to-device copy); else from the disk tier when it holds
        a verified copy (no S3 call at all, so it serves while S3 is down); otherwise
        streamed from S3 into preallocated buffers, hashed as the chunks arrive, and copied
        to the disk tier behind the request (`_write_behind`). Weights become tensors as
        zero-copy views of those buffers, adopted by a module built on the meta device (on a
        GPU, through pinned staging buffers).

        Raises:
            ModelTooLarge: a declared file size is over its limit (`limit_bytes` for all
                files together, `store.max_aux_file_bytes` for a non-weight file).
            ArtifactCorrupt: a file failed its sha256 check, or the weights do not match the
                manifest's architecture.
            StorageUnavailable: the store could not be read, or the download timed out.
            ModelLoadFailed: the artifact is not a loadable model.
        """
        predictor_cls = PREDICTORS.get(manifest.task)
        if predictor_cls is None:
            raise ModelLoadFailed(f"{manifest.key}: unsupported task {manifest.task!r}")
        self.store.check_sizes(manifest, limit_bytes)
        started = time.perf_counter()
        weights = [f.path for f in manifest.files if f.path.endswith(".safetensors")]
        others = [f.path for f in manifest.files if f.path not in weights]
        self.disk.touch(manifest)  # newest first: pruning by other loads takes it last
        folder = self.disk.path_for(manifest)
        source, prepared = "ram", None
        buffers = self.ram.get(manifest.key) if self.ram is not None else None
        if buffers is not None:
            if manifest.format == "hf-transformers" and not self.disk.has(manifest, others):
                # NOTE: transformers reads config and tokenizer from a folder
                folder = self.disk.write(manifest, buffers, others)
        else:
            source = "disk"
            buffers = self.disk.read(manifest)
        try:
            if buffers is None:
                source = "s3"
                fetch = self.store.start_fetch(manifest, order=others)
                behind = weights
                if manifest.format == "hf-transformers":
                    # NOTE: transformers reads config and tokenizer from a folder: write them
                    # now and build them while the weights are still streaming in.
                    folder = self.disk.write(manifest, fetch.wait(others), others)
                    try:
                        prepared = self._prepare(manifest, folder)
                    except BaseException:
                        fetch.cancel()
                        raise
                else:
                    behind = weights + others
                buffers = fetch.wait()
                self._write_behind(manifest, {p: buffers[p] for p in behind})
            if self.ram is not None and source != "ram":
                self.ram.put(manifest.key, buffers)
            fetched = time.perf_counter()
            state: dict[str, torch.Tensor] = {}
            for path in weights:
                state.update(tensors_from_buffer(buffers[path], f"{manifest.key}/{path}"))
            if manifest.format == "torch-module":
                module = self._torch_module(manifest, state)
                predictor = predictor_cls(manifest, module, self.device)
            else:
                if prepared is None:
                    prepared = self._prepare(manifest, folder)
                module, tokenizer = self._hf_model(manifest, prepared, state)
                predictor = predictor_cls(manifest, module, self.device, tokenizer)  # type: ignore[call-arg]
        except BaseException:
            _abandon(prepared)
            raise
        logger.info(
            "model built",
            extra={
                "key": manifest.key,
                "source": source,
                "fetch_s": round(fetched - started, 3),
                "build_s": round(time.perf_counter() - fetched, 3),
                "bytes": predictor.nbytes,
                "device": str(self.device),
            },
        )
        return predictor

    def _write_behind(self, manifest: Manifest, files: dict[str, Buffer]) -> None:
        """Copy verified files into the disk tier from a background thread, then prune.

        The thread holds the buffers only weakly: if the model is evicted before its copy is
        written, the copy is abandoned rather than keeping the model's memory alive past
        its eviction (the budget counts resident models, not pending disk writes)."""
        # NOTE: only weight buffers are kept alive by the model's tensors; the small other
        # files (capped by store.max_aux_file_bytes) are held until written.
        refs = {
            path: _weak(buffer) if path.endswith(".safetensors") else _strong(buffer)
            for path, buffer in files.items()
        }

        def write() -> None:
            try:
                if self.disk.write_weak(manifest, refs):
                    self.disk.prune(keep={self.disk.path_for(manifest)})
                else:
                    logger.info("disk tier copy abandoned: evicted", extra={"key": manifest.key})
            except OSError:
                # NOTE: the disk tier is an optimisation; a full disk only costs a refetch.
                logger.warning("disk tier write failed", extra={"key": manifest.key})

        threading.Thread(target=write, name=f"disk-tier:{manifest.key}", daemon=True).start()

    def _torch_module(self, manifest: Manifest, state: dict[str, torch.Tensor]) -> torch.nn.Module:
        if not manifest.architecture:
            raise ModelLoadFailed(f"{manifest.key}: torch-module manifest has no architecture")
        with torch.device("meta"):
            module = build_module(manifest.architecture)
        if self._h2d is not None:
            state = self._h2d.copy(state)
        try:
            module.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:
            # NOTE: the store's bytes disagree with the store's own manifest: a bad
            # artifact (502), not a server fault (500). torch names missing, unexpected and
            # mis-shaped keys in one RuntimeError, so its type is all there is to go by.
            raise ArtifactCorrupt(
                f"{manifest.key}: its weights do not match the manifest's architecture "
                "(missing, unexpected or mis-shaped tensors); not loaded"
            ) from exc
        return module.to(self.device)

    def _prepare(self, manifest: Manifest, folder: Path) -> tuple[object, object] | None:
        """For a transformers model: its config and its preprocessor (the tokenizer of a
        text model, the `ImageProcessing` of an image model), from the version's folder."""
        if manifest.format != "hf-transformers":
            return None
        from transformers import AutoConfig, AutoTokenizer

        try:
            config = AutoConfig.from_pretrained(
                str(folder), local_files_only=True, trust_remote_code=False
            )
            if manifest.task in IMAGE_TASKS:
                return config, ImageProcessing.from_folder(folder, manifest.key)
            # NOTE: the shelf builds it only if no model with the same tokenizer files
            # (by sha256) holds one, or released one recently (B7: building and freeing
            # tokenizers was ~16% of a loading host's GIL).
            tokenizer = self.tokenizers.acquire(
                tokenizer_key(manifest, config),
                lambda: AutoTokenizer.from_pretrained(
                    str(folder), config=config, local_files_only=True, trust_remote_code=False
                ),
            )
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadFailed(
                f"{manifest.key}: not a loadable transformers model ({type(exc).__name__})"
            ) from exc
        return config, tokenizer

    def _hf_model(
        self,
        manifest: Manifest,
        prepared: tuple[object, object],
        state: dict[str, torch.Tensor],
    ) -> tuple[torch.nn.Module, object]:
        from transformers import (
            AutoModel,
            AutoModelForImageClassification,
            AutoModelForSequenceClassification,
        )

        config, tokenizer = prepared
        auto_cls = {
            "text-classification": AutoModelForSequenceClassification,
            "image-classification": AutoModelForImageClassification,
            # NOTE: the embedder is the classifier without its head (see ImageEmbedder)
            "image-embedding": AutoModelForImageClassification,
        }.get(manifest.task, AutoModel)
        try:
            # NOTE: the concrete class for this config (never remote code); it adopts the
            # state dict, whose tensors are views of the fetched bytes.
            model_cls = auto_cls._model_mapping[type(config)]
            module = model_cls.from_pretrained(None, config=config, state_dict=state)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:
            # NOTE: transformers raises RuntimeError for tensors whose shapes differ from
            # the config's (ignore_mismatched_sizes=False); OOM (a subclass) is not that.
            raise ArtifactCorrupt(
                f"{manifest.key}: its weights do not match its config (mis-shaped tensors); "
                "not loaded"
            ) from exc
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadFailed(
                f"{manifest.key}: not a loadable transformers model ({type(exc).__name__})"
            ) from exc
        if self._h2d is not None:
            # NOTE: parameters and persistent buffers go through the pinned staging buffers;
            # `.to()` below then only moves what the state dict does not hold.
            module.load_state_dict(self._h2d.copy(module.state_dict()), assign=True)
        return module.eval().to(self.device), tokenizer


def _abandon(prepared: tuple[object, object] | None) -> None:
    """Release the tokenizer lease of a load that failed after `_prepare`."""
    if prepared is not None and isinstance(prepared[1], TokenizerLease):
        prepared[1].release()


def _weak(buffer: Buffer) -> Callable[[], Buffer | None]:
    """A weak reference to a fetch buffer (an empty bytearray, which cannot be weakly
    referenced, is simply held: it costs nothing)."""
    if isinstance(buffer, mmap.mmap):
        return weakref.ref(buffer)
    return _strong(buffer)


def _strong(buffer: Buffer) -> Callable[[], Buffer | None]:
    """A reference-shaped callable that keeps `buffer` alive."""
    return lambda: buffer
