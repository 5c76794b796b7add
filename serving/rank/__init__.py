"""What runs inside an MPI rank: the entry point, rank 0's relay, every rank's worker, and the handler API
(Input/Output with DJL's method names)."""
