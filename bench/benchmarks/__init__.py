"""Speed and memory measurements: each prints a Markdown table and writes JSON."""
