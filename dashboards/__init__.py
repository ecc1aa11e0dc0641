"""The mythos-probe dashboard: a Dash app over a DuckDB store (`app.create_app`), its pages, and
the `mythos-probe dashboard FILE` command. It reads the store with SQL and never imports torch or
the model; it writes nothing.
"""
