from compress.cli import entry

entry()
