"""params.yaml: its schema (schema.py), its reading (load.py), the one-line errors (errors.py) and the
choices it shares with the CLI and the library (choices.py). Nothing is imported here, so a module that
needs only the choices stays cheap."""
