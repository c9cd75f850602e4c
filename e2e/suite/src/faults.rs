//! Faults injected for real into simulated clusters: a replication link cut (its connections reset, or
//! silently blackholed) and restored; a member cluster's API server stopped and started again; a control
//! path down while a link is cut ([`ControlPathFault`]).

use lockstep_kube::backend::ApiServer;
use lockstep_replicator::linkcut::LinkMode;

use crate::cluster::{ClusterError, SimCluster};

/// How a replication link is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LinkCutMode {
    /// Every connection is reset at once: the primary sees the failure immediately.
    #[default]
    Reset,
    /// Every byte is dropped silently: the primary sees only silence, and a write's copy fails when the
    /// secondary has not acknowledged it within the copy timeout (a dead route).
    Blackhole,
}

impl LinkCutMode {
    fn mode(self) -> LinkMode {
        match self {
            LinkCutMode::Reset => LinkMode::Reset,
            LinkCutMode::Blackhole => LinkMode::Blackhole,
        }
    }
}

impl std::fmt::Display for LinkCutMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LinkCutMode::Reset => "reset",
            LinkCutMode::Blackhole => "blackholed",
        })
    }
}

/// A control path taken down just before the link is cut, and brought back before the resync: the freeze
/// must still reach every member over the other path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ControlPathFault {
    /// The API server of the last member cluster is stopped: that cluster's sidecar hears the freeze
    /// and answers over gRPC only.
    ApiDown,
    /// The sidecars' connections to the operator's gRPC listener are reset and refused: every member
    /// freezes through the API servers.
    GrpcDown,
}

impl std::fmt::Display for ControlPathFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ControlPathFault::ApiDown => "a member's API server stopped",
            ControlPathFault::GrpcDown => "the sidecars' gRPC path to the operator cut",
        })
    }
}

impl SimCluster {
    /// Cuts the replication link of volume `handle`.
    pub fn cut_link(&self, handle: &str, how: LinkCutMode) -> Result<(), ClusterError> {
        self.volume(handle)?.link.set_mode(how.mode());
        Ok(())
    }

    /// Lets the replication link of volume `handle` carry traffic again (new connections, and open ones
    /// that were blackholed).
    pub fn restore_link(&self, handle: &str) -> Result<(), ClusterError> {
        self.volume(handle)?.link.set_mode(LinkMode::Pass);
        Ok(())
    }

    /// The cluster's API server when the suite started it (test or real), or why there is none to
    /// control.
    pub fn api_server(&self) -> Result<&ApiServer, ClusterError> {
        self.api
            .as_ref()
            .ok_or_else(|| ClusterError::NotControllable {
                cluster: self.spec.name.clone(),
            })
    }

    /// Whether the link of volume `handle` carries traffic.
    pub fn link_is_up(&self, handle: &str) -> Result<bool, ClusterError> {
        Ok(self.volume(handle)?.link.mode() == LinkMode::Pass)
    }

    /// Stops the cluster's API server: connections are refused and open watches cut; its objects are
    /// kept. Only an API server the suite started can be stopped.
    pub async fn stop_api_server(&self) -> Result<(), ClusterError> {
        self.api_server()?.stop().await;
        Ok(())
    }

    /// Starts the cluster's API server again on the same port, with the same objects.
    pub async fn start_api_server(&self) -> Result<(), ClusterError> {
        self.api_server()?
            .start_again()
            .await
            .map_err(|source| ClusterError::ApiServer {
                cluster: self.spec.name.clone(),
                source: Box::new(source),
            })
    }
}
