"""The error types that describe a user's mistake (bad config, data, checkpoint, image,
device). The CLI prints them as one clear line instead of a traceback; the app shows them
as a message on the page."""

from __future__ import annotations

from das_core.checkpoint import CheckpointError
from das_core.config import ConfigError
from das_core.data.base import DatasetError
from das_core.embed import DeviceError
from das_core.images import ImageError
from das_core.jobs import JobError
from das_core.models.backbones import ModelError
from das_core.training import TrainingError

USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    DatasetError,
    CheckpointError,
    ImageError,
    ModelError,
    DeviceError,
    TrainingError,
    JobError,
)
