#!/bin/bash
# A process driver's first steps in the test container (packaging/test/setup.sh): reports on
# stderr, which the agent logs to the journal, whether the agent's state directory, its TLS key
# and its control socket are out of reach from inside the driver sandbox, then becomes the
# driver given as its arguments.
seen=$(ls -A /var/lib/texture-agent 2>&1)
breaches=""
[ -z "$seen" ] || breaches="$breaches state-dir-lists:[$(echo $seen | tr '\n' ' ')]"
for f in /var/lib/texture-agent/device-key /etc/texture-agent/device.key; do
  if head -c1 "$f" >/dev/null 2>&1; then breaches="$breaches readable:$f"; fi
done
[ -e /run/texture-agent/control.sock ] && breaches="$breaches control-socket-visible"
env_names=$(env | cut -d= -f1 | grep -v -x -E 'PWD|SHLVL|_' | sort | tr '\n' ' ')
if [ -z "$breaches" ]; then
  echo "sandbox-probe: held; environment: $env_names" >&2
else
  echo "sandbox-probe: BREACH$breaches; environment: $env_names" >&2
fi
exec "$@"
