"""The command line: argument parsing, dispatch to the jobs, and the small printing commands."""
