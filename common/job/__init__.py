"""The job: its config and start-up checks, the model zoo, the shared trainer, precision, run
metadata, the export, progress and logs. Imports ``lte.common.core`` and ``lte.common.data.datasets``."""
