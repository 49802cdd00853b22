# exoagent (rpm) %post; $1 is 1 on a first install, 2 on an upgrade. Create the directories;
# on a first install enable the unit but do not start it (cloud-init's userdata or the next
# boot does). `enable`, not `preset`: EL's default preset policy disables unknown units.
systemd-tmpfiles --create exoagent.conf >/dev/null 2>&1 || :
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
if [ "$1" -eq 1 ]; then
    systemctl --no-reload enable exoagent.service >/dev/null 2>&1 || :
fi
