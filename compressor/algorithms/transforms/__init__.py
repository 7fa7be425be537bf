"""Equivalent transforms: QuaRot rotations, OSTQuant, what they share (fusion), QSUR."""
