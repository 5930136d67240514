"""The jobs behind the commands: export (stages), sweep, their benchmark, accuracy and report parts."""
