"""The service, by stage: ingest/ -> jobs/ -> delivery/, composed by server.py; cli/ on top;
settings.py and wire.py beneath (docs/DESIGN.md "Module map")."""
