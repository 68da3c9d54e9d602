# Tests run on CPU; scripts/test sets the environment up the first time.
.PHONY: test test-faults

# The default suite: unit tests plus the short fault suite (CI).
test:
	scripts/test

# The long fault-injection suite: >= 20 crash trials, 10,000 malformed messages, summary table
# printed at the end and written to /tmp/actprm-faults-summary.txt.
test-faults:
	scripts/test -m faults -s
