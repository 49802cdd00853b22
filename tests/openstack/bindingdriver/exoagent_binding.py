"""Test-only ML2 mechanism driver for the exoagent OpenStack harness.

The harness runs neutron-server without any agent (no OVS, no DHCP, no L3), so nothing would
ever bind a port and servers with a port could not boot. This driver binds every port to the
first segment offered, as an OVS port, ACTIVE at once: the Neutron counterpart of Nova's fake
virt driver. It never touches the host network.
"""

from neutron_lib.api.definitions import portbindings
from neutron_lib.plugins.ml2 import api


class BindEverything(api.MechanismDriver):
    def initialize(self):
        pass

    @property
    def connectivity(self):
        return portbindings.CONNECTIVITY_L2

    def bind_port(self, context):
        for segment in context.segments_to_bind:
            context.set_binding(
                segment[api.ID],
                portbindings.VIF_TYPE_OVS,
                {portbindings.CAP_PORT_FILTER: True, portbindings.OVS_HYBRID_PLUG: False},
                status="ACTIVE",
            )
            return
