"""telemetry-processor: Redis Stream -> PostgreSQL/TimescaleDB, positions only, nothing lost."""

__version__ = "0.1.0"
