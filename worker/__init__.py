"""cost-worker: AI-provider cost and usage events from Kafka into a cost ledger and budget alerts."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cost-worker")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"
