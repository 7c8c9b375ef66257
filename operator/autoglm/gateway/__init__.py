"""The L7 gateway in front of the active slot."""

import os

# The gateway's gRPC server runs in processes that also start servers (``autoglm up``);
# gRPC's fork handlers then crash children between fork and exec (SIGSEGV/SIGABRT seen),
# and nothing here forks to keep using gRPC, so they stay off.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
