"""Aligning the generators on Ray Train with TRL: junior SFT, senior DPO, revisor SFT."""
