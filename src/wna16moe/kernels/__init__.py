"""Raw Triton kernels and their launchers; no policy (backend choice, configs) lives here."""
