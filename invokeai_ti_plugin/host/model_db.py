"""InvokeAI's model records and installer, opened the way the host itself builds them.

The CLI opens them standalone on the root's SQLite database (a running `invokeai-web` sees every
change at its next request); inside the server the plugin borrows the server's own instances.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .app_config import use_root

if TYPE_CHECKING:
    from invokeai.app.services.config.config_default import InvokeAIAppConfig
    from invokeai.app.services.invocation_services import InvocationServices
    from invokeai.app.services.model_images.model_images_base import ModelImageFileStorageBase
    from invokeai.app.services.model_install.model_install_base import ModelInstallServiceBase
    from invokeai.app.services.model_records import ModelRecordChanges
    from invokeai.app.services.model_records.model_records_base import ModelRecordServiceBase
    from invokeai.app.services.model_relationship_records.model_relationship_records_base import (
        ModelRelationshipRecordStorageBase,
    )


@dataclass(frozen=True)
class HostModels:
    """The host's view of its models: configuration, records, the installer that probes, the
    cover images its model manager shows, and which models are related (its pickers can show
    only the embeddings related to the main model in use)."""

    config: InvokeAIAppConfig
    store: ModelRecordServiceBase
    installer: ModelInstallServiceBase
    images: ModelImageFileStorageBase
    relationships: ModelRelationshipRecordStorageBase

    @property
    def root(self) -> Path:
        return Path(self.config.root_path)

    def absolute(self, record_path: str) -> Path:
        """Record paths inside the models folder are stored relative to it."""
        path = Path(record_path)
        return path if path.is_absolute() else Path(self.config.models_path) / path

    def register(self, path: Path, changes: ModelRecordChanges) -> str:
        """Register `path` in place, as the host's probe reads it (quietly: see `quiet_host`);
        the new record's key."""
        with quiet_host():
            return self.installer.register_path(path, changes)

    @classmethod
    def of_server(cls, services: InvocationServices) -> HostModels:
        """A running server's own instances: inside it, nothing opens a second writer."""
        manager = services.model_manager
        return cls(
            services.configuration,
            manager.store,
            manager.install,
            services.model_images,
            services.model_relationship_records,
        )


@contextmanager
def quiet_host() -> Iterator[None]:
    """Keep the host's own chatter off our user's terminal, and the process's warning filters
    as they were. Its model manager imports every node the host ships, whose modules warn about
    their deprecated calls, transformers warns about a renamed class, and the host logs that
    patchmatch is ready. Its model probe ends by turning every warning on for the whole process
    (`SilenceWarnings`), so the libraries it imports next print their deprecation notices (onnx's
    protobuf on Python 3.12, for one), and so would every later import of ours."""
    from invokeai.backend.util.logging import InvokeAILogger
    from transformers.utils import logging as transformers_logging

    host_logger = InvokeAILogger.get_logger()
    host_level, transformers_level = host_logger.level, transformers_logging.get_verbosity()
    host_logger.setLevel(logging.WARNING)
    transformers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        host_logger.setLevel(host_level)
        transformers_logging.set_verbosity(transformers_level)


@contextmanager
def open_host_models(root: Path) -> Iterator[HostModels]:
    """The root's model database, created by the host's migrations if it is new.

    The installer is not started: registering needs no background thread, and starting it
    would tidy up install folders that a running server may be using.
    """
    config = use_root(root)
    from invokeai.app.services.download.download_default import DownloadQueueService
    from invokeai.app.services.image_files.image_files_disk import DiskImageFileStorage
    from invokeai.app.services.model_images.model_images_default import (
        ModelImageFileStorageDisk,
    )
    from invokeai.app.services.model_install.model_install_default import ModelInstallService
    from invokeai.app.services.model_records.model_records_sql import ModelRecordServiceSQL
    from invokeai.app.services.model_relationship_records.model_relationship_records_sqlite import (
        SqliteModelRelationshipRecordStorage,
    )
    from invokeai.app.services.shared.sqlite.sqlite_util import init_db
    from invokeai.backend.util.logging import InvokeAILogger

    host_logger = InvokeAILogger.get_logger("invokeai-ti", config=config)
    host_logger.setLevel(logging.WARNING)  # the host's routine database messages are not ours
    db = init_db(
        config=config,
        logger=host_logger,
        image_files=DiskImageFileStorage(config.outputs_path / "images"),
    )
    store = ModelRecordServiceSQL(db=db, logger=host_logger)
    installer = ModelInstallService(
        app_config=config,
        record_store=store,
        download_queue=DownloadQueueService(app_config=config),
    )
    images = ModelImageFileStorageDisk(Path(config.models_path) / "model_images")  # as the host
    relationships = SqliteModelRelationshipRecordStorage(db=db)
    yield HostModels(config, store, installer, images, relationships)
