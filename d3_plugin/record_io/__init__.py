"""BackdoorBench's files, read and written at the ground floor: attack records (`records`), safe checkpoint
loading (`safe_load`), the clean datasets beside a checkout (`datasets`), result tables and plots
(`outputs`) and the reserved clean subset (`reserved`). Every layer may import it; the BackdoorBench adapter
and installer (`d3_plugin.backdoorbench`) sit on top."""
