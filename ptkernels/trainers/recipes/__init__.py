"""One file per ``ptk`` command: a stage (config, loading, its loss module, train), the pipeline, eval and report."""
