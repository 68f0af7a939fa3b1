"""`python -m sparse_infer.profiler profile ...` / `... plan show PLAN` (same commands as sparse-infer)."""
from sparse_infer.profiler.cli import main

main()
