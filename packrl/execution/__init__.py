"""Running untrusted code: the sandbox, its child process, and the worker pools that grade."""
