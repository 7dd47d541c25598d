"""The throughput pipeline. Never imports ``processor.domain`` (DEVELOPERS.md rule 1)."""
