"""Demonstrations on the project's own data: the controlled-sentiment preference task (DPO paper, §6.1)."""
