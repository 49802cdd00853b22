# exoagent (rpm) %preun; $1 is 0 on erase, 1 on an upgrade. Erase disables and stops the agent;
# an upgrade does not stop it (%postun restarts it). Services keep running either way
# (KillMode=process); run `exoagent down` before erasing to stop them.
if [ "$1" -eq 0 ]; then
    systemctl --no-reload disable --now exoagent.service >/dev/null 2>&1 || :
fi
