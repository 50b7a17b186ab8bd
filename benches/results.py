"""Writes one named section of benches/RESULTS.md, replacing the previous figures of that section in place."""
import re

PATH = "benches/RESULTS.md"
HEADER = ("# Benchmark results\n\nEvery figure names the command that produced it; "
          "ratios are against the anchor measured in the same run.\n\n")


def write_section(name, section):
    try:
        text = open(PATH).read()
    except FileNotFoundError:
        text = HEADER
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{section}\n{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda m: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    open(PATH, "w").write(text)
    print(section)
