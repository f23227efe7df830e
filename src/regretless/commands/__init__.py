"""Thin CLI adapters: parse flags into a config, call the library, print. No logic lives here."""
