"""Shared machinery of the ops: argument checks, the chunk loop, backend dispatch and the GEMMs."""
