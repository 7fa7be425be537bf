"""Distillation maths: losses (KL family, chunked, hidden-state, Plackett-Luce) and student preparation."""
