"""Equivalent transforms: Hadamard constructions (hadamard), online rotations (online), model rotation and the rotate pass (rotate)."""
