# exoagent (rpm) %postun; $1 is 0 on erase, 1 on an upgrade. On an upgrade restart the agent
# only if it is running: its services run under their own shims, which KillMode=process leaves
# alone and the new agent adopts, so a researcher's session is never interrupted. Erase keeps
# /etc/exoagent and /var/lib/exoagent (rpm has no purge).
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
if [ "$1" -ge 1 ]; then
    systemctl try-restart exoagent.service >/dev/null 2>&1 || :
fi
