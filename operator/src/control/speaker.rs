//! Who speaks on a Control call: the node its token proves, and a node speaking only for its own volumes.

use lockstep_api::proto::control::v1 as pb;
use tonic::{Request, Status};

use super::{ControlService, NAMED_IN_REASON};
use crate::{ingest::grpc::node_key, sessions::NodeKey, tls::ConnectionInfo};

/// Who speaks on a call, and whether a token proved it (false only on a plaintext connection).
pub(super) struct Speaker {
    pub(super) node: NodeKey,
    pub(super) peer: Option<std::net::IpAddr>,
    pub(super) verified: bool,
}

impl ControlService {
    /// Who is speaking: the node the call's token proves, which must be the node the message names
    /// (UNAUTHENTICATED without a valid token, PERMISSION_DENIED for a message speaking for another
    /// node). A plaintext connection (served only with --grpc-insecure-plaintext) is not authenticated:
    /// the message's node is taken as it says.
    pub(super) fn authenticate<T>(
        &self,
        request: &Request<T>,
        what: &str,
        node: Option<&pb::NodeIdentity>,
    ) -> Result<Speaker, Status> {
        let claimed = node_key(node, what, self.engine.metrics())?;
        let connection = request.extensions().get::<ConnectionInfo>().copied();
        if connection.is_some_and(|connection| !connection.tls) {
            return Ok(Speaker {
                node: claimed,
                peer: connection
                    .and_then(|connection| connection.remote)
                    .map(|remote| remote.ip()),
                verified: false,
            });
        }
        let peer = connection
            .and_then(|connection| connection.remote)
            .map(|remote| remote.ip());
        let authenticator = self.engine.authenticator();
        let speaking_for = format!("{}/{}", claimed.0, claimed.1);
        match authenticator.authenticate(request.metadata(), &claimed.0) {
            Err(refusal) => {
                let message = format!("{what} refused: {refusal}");
                authenticator.refused(peer, &speaking_for, refusal.reason(), &message);
                Err(Status::unauthenticated(message))
            }
            Ok(who) if who.cluster != claimed.0 || who.node != claimed.1 => {
                let message = format!(
                    "{what} refused: the credential is node {} of cluster {}, and the message speaks for node {} of cluster {}",
                    who.node, who.cluster, claimed.1, claimed.0
                );
                authenticator.refused(peer, &speaking_for, "other_node", &message);
                Err(Status::permission_denied(message))
            }
            Ok(who) => Ok(Speaker {
                node: (who.cluster, who.node),
                peer,
                verified: true,
            }),
        }
    }

    /// Refuses a call that names volumes the group resolves, in the speaker's cluster, to another node
    /// (or to no node: several claim it): a node speaks for its own volumes only. Volumes the group
    /// has not resolved pass (they are recorded for nobody; a failure about one still freezes).
    pub(super) async fn own_volumes_only<'a>(
        &self,
        speaker: &Speaker,
        what: &str,
        group_uid: &str,
        handles: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), Status> {
        if !speaker.verified {
            return Ok(());
        }
        let status = self.engine.decided_status(group_uid).await;
        let members = status
            .as_ref()
            .map(|status| status.members.as_slice())
            .unwrap_or_default();
        let (cluster, node) = &speaker.node;
        // By handle, once: a node names hundreds of volumes of a group of thousands.
        let by_handle: std::collections::HashMap<
            &str,
            &lockstep_api::v1alpha1::MemberVolumeStatus,
        > = members
            .iter()
            .filter(|member| member.cluster == *cluster)
            .filter_map(|member| Some((member.volume_handle.as_deref()?, member)))
            .collect();
        let foreign: Vec<String> = handles
            .into_iter()
            .filter_map(|handle| {
                let member = by_handle.get(handle)?;
                (member.node.as_deref() != Some(node.as_str())).then(|| {
                    format!(
                        "{handle} (on {})",
                        member.node.as_deref().unwrap_or("no single node")
                    )
                })
            })
            .collect();
        if foreign.is_empty() {
            return Ok(());
        }
        let named: Vec<&str> = foreign
            .iter()
            .take(NAMED_IN_REASON)
            .map(String::as_str)
            .collect();
        let message = format!(
            "{what} refused: node {node} of cluster {cluster} speaks only for its own volumes, and {} {} not on it",
            named.join(", "),
            if foreign.len() == 1 { "is" } else { "are" }
        );
        self.engine.authenticator().refused(
            speaker.peer,
            &format!("{cluster}/{node}"),
            "not_own_volume",
            &message,
        );
        Err(Status::permission_denied(message))
    }
}
