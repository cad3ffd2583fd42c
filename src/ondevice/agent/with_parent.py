"""``python -I -S with_parent.py PID COMMAND [ARGS...]``: become COMMAND, set to get SIGTERM when its parent ends.

How an ``--mcp`` server is started on Linux (:func:`ondevice.agent.mcptools.dies_with_agent`): an agent killed
outright (SIGKILL, the out-of-memory killer) runs no ``finally`` and cannot end its MCP servers, which were left
running with parent 1 (a server busy in a call does not notice its stdin close). The MCP SDK starts the server
with no hook between fork and exec, so this launcher is that hook: it sets Linux's parent-death signal (what
``ondevice``'s supervisor sets for its child), then execs COMMAND: the same process, pid and pipes, and the
signal survives the exec. It fires when the thread that started the process ends: the client's event-loop
thread, which lives until the server is closed. PID is the agent's: if the agent died before the signal was
set, it would never come, so COMMAND does not start.

Run by its path without site-packages (``-S``): it imports only the standard library and ``ondevice.supervise``.
"""

import os
import signal
import sys


def main(argv: list[str]) -> int:
    parent, command, *args = argv
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from ondevice.supervise import _term_with_parent

    _term_with_parent()
    if os.getppid() != int(parent):  # the agent is gone already: what the signal would have done
        os.kill(os.getpid(), signal.SIGTERM)
    try:
        os.execvp(command, [command, *args])
    except OSError as e:  # found on PATH a moment ago (dies_with_agent): a rare race, said as a shell says it
        print(f"ondevice: cannot run the MCP server {command}: {e.strerror}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
