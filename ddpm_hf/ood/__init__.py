"""Out-of-distribution detection: the reconstruction and likelihood scores and their metrics."""
