"""Small helpers every layer uses: one-line errors, logging, safe file writes, folder locks,
the host allocator policy and the precision policy. Imports nothing else of ddpm_hf."""
