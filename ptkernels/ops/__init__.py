"""One file per op family (argument checks, autograd.Function, public function) over core/ (shared machinery)
and backends/ (the non-GEMM half, one module per backend)."""
