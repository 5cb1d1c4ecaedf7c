"""The error types that describe a user's mistake (bad config, data, checkpoint, image,
device). The CLI prints them as one clear line instead of a traceback; the app shows them
as a message on the page."""

from __future__ import annotations

from das_core.data.base import DatasetError
from das_core.data.images import ImageError
from das_core.models.backbones import ModelError
from das_core.runtime import DeviceError
from das_core.store.checkpoint import CheckpointError
from das_core.store.external import EmbeddingsFileError
from das_core.store.jobs import JobError
from das_core.store.timeline import TimelineError
from das_core.training.config import ConfigError
from das_core.training.loop import TrainingError

USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    DatasetError,
    CheckpointError,
    EmbeddingsFileError,
    ImageError,
    ModelError,
    DeviceError,
    TrainingError,
    JobError,
    TimelineError,
)
