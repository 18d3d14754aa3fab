"""Sampling pieces shared by every backend: schedulers, seeded noise, the colour fix."""
