"""Naive PyTorch references: short, float64-capable, obviously right. Never import the ops from here."""
