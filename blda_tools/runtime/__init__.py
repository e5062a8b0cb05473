"""How a blda process runs: settings and services that every stage shares.

- `process`: process-wide CPU settings (glibc's allocator keeps freed memory for long inference
  runs; torch's thread count for a block of work) and worker processes that end with the
  process that started them (`exit_with_parent`, SIGKILL included);
- `jit`: numba kernels compiled once per installation, with a one-line notice when they are;
- `progress`: progress as plain periodic lines where the output is not a terminal;
- `lazy`: package names imported from their modules on first use (light `--help`);
- `memory`: refusing arrays an option sizes when they cannot fit in the memory available.

Nothing is imported here, so that `blda --help` can read `progress` without loading torch.
"""
