"""Everything that talks across processes: mesh, sequence splitting, ring attention, LASP, data parallelism."""
