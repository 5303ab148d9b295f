"""Procedural task families: seeded problems with exact solutions (raypost data synth)."""
