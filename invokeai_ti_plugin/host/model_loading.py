"""Training on a model loaded by InvokeAI's own model manager.

Inside the server, a node passes `lambda sub: context.models.load(identifier, submodel_type=sub)`;
the command line and the form build the same model-load service on the root, as the server does
(`standalone_model_loader`). Either way InvokeAI loads every main model it can run (diffusers
folders and single-file checkpoints alike), in its own precision, on its own device, in its own
cache, and training shares those parts instead of loading a second copy:

- the UNet, text encoders and VAE are the cache's own objects, locked on their device for the
  whole run (so the cache does not move them away mid-training) and put back exactly as they
  were before the lock is released: training swaps a text encoder's token lookup, sets its
  end-of-text id, freezes parameters, and may switch attention or gradient checkpointing, and
  every one of those changes is undone (`_restorer`);
- the tokenizers are copied (a few MB): a tokenizer cannot forget added words;
- only SDXL's VAE is copied where InvokeAI loads it in float16, to float32 (it overflows in
  float16; 335 MB), and only for the run. The UNet is never copied.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler
from transformers import PretrainedConfig

from ..errors import UserInputError
from ..training.bases import TOKEN_DIMS
from ..training.model_files import (
    ModelInfo,
    ModelParts,
    ModelSource,
    freeze_parts,
    inspect_model,
    vae_dtype,
)
from .installed_models import problem_of
from .model_db import open_host_models, quiet_host

if TYPE_CHECKING:
    from invokeai.backend.model_manager.configs.factory import AnyModelConfig
    from invokeai.backend.model_manager.load.load_base import LoadedModelWithoutConfig
    from invokeai.backend.model_manager.taxonomy import SubModelType

SubmodelLoader = Callable[["SubModelType"], "LoadedModelWithoutConfig"]

logger = logging.getLogger(__name__)


def host_model_source(record: AnyModelConfig, load: SubmodelLoader) -> ModelSource:
    """Train on InvokeAI's main model `record`, whose parts `load` gets from the host."""
    from invokeai.app.services.config.config_default import get_config
    from invokeai.backend.util.devices import TorchDevice

    path = Path(get_config().models_path) / record.path  # absolute paths stay as they are
    problem = problem_of(record, path)
    if problem:
        raise UserInputError(f"{record.name} cannot be trained: {problem}", option="model")
    return HostModelSource(_record_info(record, path), load, TorchDevice.choose_torch_dtype())


def _record_info(record: AnyModelConfig, path: Path) -> ModelInfo:
    """A diffusers model tells its facts by its configs; a checkpoint by the host's record (its
    base) and the family's native size. The prediction type is always the record's: InvokeAI
    generates with it, whatever the scheduler config says (see `_noise_scheduler`)."""
    prediction_type = record.prediction_type.value
    if record.format.value == "diffusers":
        return replace(
            inspect_model(path),
            name=record.name,
            prediction_type=prediction_type,
            host_key=record.key,
        )
    base = record.base.value
    native = {"sd-1": 512, "sd-2": 768 if prediction_type == "v_prediction" else 512}
    return ModelInfo(
        folder=None,
        base=base,
        token_dims=TOKEN_DIMS[base],
        native_resolution=native.get(base, 1024),
        prediction_type=prediction_type,
        name=record.name,
        host_key=record.key,
    )


class HostModelSource:
    """The parts of one model from InvokeAI's loader, held for one run (see the module)."""

    def __init__(self, info: ModelInfo, load: SubmodelLoader, dtype: torch.dtype) -> None:
        self.info = info
        self.dtype = dtype
        self._load = load
        self._held = ExitStack()
        self._vae: AutoencoderKL | None = None

    def load_parts(self, dtype: torch.dtype) -> ModelParts:
        from invokeai.backend.model_manager.taxonomy import SubModelType

        if dtype != self.dtype:
            raise ValueError(f"InvokeAI loads this model in {self.dtype}, not {dtype}")
        count = 2 if self.info.is_sdxl else 1
        tokenizer_types = [SubModelType.Tokenizer, SubModelType.Tokenizer2][:count]
        encoder_types = [SubModelType.TextEncoder, SubModelType.TextEncoder2][:count]
        try:
            tokenizers = [copy.deepcopy(self._load(kind).model) for kind in tokenizer_types]
            text_encoders = [self._hold(kind) for kind in encoder_types]
            unet = self._hold(SubModelType.UNet)
            scheduler = self._load(SubModelType.Scheduler).model
        except (OSError, ValueError) as error:
            self.close()
            raise UserInputError(
                f"InvokeAI cannot load {self.info.label}: {error}", option="model"
            ) from error
        freeze_parts(tokenizers, text_encoders, unet)
        return ModelParts(
            self.info,
            dtype,
            tokenizers,
            text_encoders,
            unet,
            _noise_scheduler(scheduler.config, self.info),
            partial(self.load_vae, dtype),
        )

    def load_vae(self, dtype: torch.dtype) -> AutoencoderKL:
        """The host's VAE, held for the rest of the run; a float32 copy of SDXL's where the
        host's is float16."""
        from invokeai.backend.model_manager.taxonomy import SubModelType

        if self._vae is None:
            wanted = vae_dtype(self.info, dtype)
            loaded = self._load(SubModelType.VAE)
            if loaded.model.dtype == wanted:
                self._vae = self._hold(SubModelType.VAE, loaded)
            else:
                with loaded.model_in_ram() as vae:
                    self._vae = copy.deepcopy(vae).to(dtype=wanted).requires_grad_(False).eval()
        return self._vae

    def close(self) -> None:
        """Put every held part back as it was, then let the cache have it again."""
        self._vae = None
        self._held.close()

    def _hold(self, kind: SubModelType, loaded: LoadedModelWithoutConfig | None = None) -> Any:
        """The cache's part, locked on its device until `close`, which first restores it."""
        loaded = loaded or self._load(kind)
        _, model = self._held.enter_context(loaded.model_on_device())
        self._held.callback(_restorer(model))  # runs before the unlock: the stack unwinds
        return model


def _noise_scheduler(config: Any, info: ModelInfo) -> DDPMScheduler:
    """The training noise schedule, predicting what InvokeAI's record says the model predicts.

    InvokeAI generates with the record's prediction type, not the scheduler config's: a
    checkpoint's config is its family's (diffusers gives every SD 2 file SD 2.1's v-prediction,
    SD 2.1-base included, and SDXL base files epsilon, v-prediction finetunes included), and a
    user corrects a wrong one in the model manager. Training on the other target would teach
    the word for a model that InvokeAI does not run."""
    configured = config.get("prediction_type", "epsilon")
    if configured != info.prediction_type:
        logger.warning(
            "%s predicts %s by InvokeAI's model record (its scheduler config says %s); training "
            "follows the record, as InvokeAI's generation does. If the record is wrong, change "
            "its prediction type in InvokeAI's model manager",
            info.label,
            info.prediction_type,
            configured,
        )
    return DDPMScheduler.from_config(config, prediction_type=info.prediction_type)


def _restorer(root: torch.nn.Module) -> Callable[[], None]:
    """A function that puts `root` back as it is now: every submodule's attributes and the
    contents of their module, parameter, buffer and hook tables (the swapped token lookup,
    accelerate's forward wrappers, attention processors, gradient checkpointing, train/eval),
    each parameter's requires_grad, and transformers configs' values (the end-of-text id)."""
    modules = [(module, dict(vars(module)), _tables_of(module)) for module in root.modules()]
    flags = [(parameter, parameter.requires_grad) for parameter in root.parameters()]
    configs = {
        id(config): (config, dict(vars(config)))
        for module in root.modules()
        if isinstance(config := getattr(module, "config", None), PretrainedConfig)
    }

    def restore() -> None:
        for module, attributes, tables in modules:
            for name, contents in tables.items():
                attributes[name].clear()
                attributes[name].update(contents)
            vars(module).clear()
            vars(module).update(attributes)
        for config, values in configs.values():
            vars(config).clear()
            vars(config).update(values)
        for parameter, flag in flags:
            parameter.requires_grad_(flag)

    return restore


def _process_gpu() -> torch.device | None:
    """This process's GPU when a launcher (accelerate launch, torchrun) runs one per GPU, as
    accelerate will place it; otherwise InvokeAI's own choice (None)."""
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is None or not torch.cuda.is_available():
        return None
    return torch.device("cuda", int(local_rank))


def _tables_of(module: torch.nn.Module) -> dict[str, dict[Any, Any]]:
    """Copies of the module's tables (submodules, parameters, buffers, hooks), by name; not of
    frozen dicts (a diffusers config), which nothing changes in place."""
    tables = (dict, OrderedDict)
    return {name: dict(value) for name, value in vars(module).items() if type(value) in tables}


@contextmanager
def standalone_model_loader(
    root: Path,
) -> Iterator[Callable[[AnyModelConfig], SubmodelLoader]]:
    """InvokeAI's model manager on `root`, built as the server builds it (`ApiDependencies`):
    its model cache, execution device and precision from the root's invokeai.yaml. Yields, for
    a model record, the loader of its parts; the cache is shut down at the end."""
    with quiet_host():
        from invokeai.app.services.download.download_default import DownloadQueueService
        from invokeai.app.services.events.events_base import EventServiceBase
        from invokeai.app.services.model_manager.model_manager_default import ModelManagerService

    with open_host_models(root) as models, _host_log_on_our_console(ModelManagerService.__name__):
        manager = ModelManagerService.build_model_manager(
            app_config=models.config,
            model_record_service=models.store,
            download_queue=DownloadQueueService(app_config=models.config),
            events=EventServiceBase(),  # nobody listens outside the server
            execution_device=_process_gpu(),
        )
        load_service = manager.load
        try:
            yield lambda record: partial(load_service.load_model, record)
        finally:
            for cache in load_service.ram_caches.values():  # type: ignore[attr-defined]
                cache.shutdown()


@contextmanager
def _host_log_on_our_console(name: str) -> Iterator[None]:
    """The host's model manager logs every cache decision for its own console; on ours only
    its warnings belong, written to the stderr of now (its handler keeps the stream it was
    made with)."""
    from invokeai.backend.util.logging import InvokeAILogger

    handlers = [
        handler
        for handler in InvokeAILogger.get_logger(name).handlers
        if type(handler) is logging.StreamHandler
    ]
    before = [(handler.level, handler.stream) for handler in handlers]
    for handler in handlers:
        handler.setLevel(logging.WARNING)
        handler.stream = sys.stderr  # not setStream: it flushes the old one, maybe closed
    try:
        yield
    finally:
        for handler, (level, stream) in zip(handlers, before, strict=True):
            handler.setLevel(level)
            handler.stream = stream
