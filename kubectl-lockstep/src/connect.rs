//! The connection to the hub, made as kubectl makes it (`--kubeconfig`, `--context`, `-n`), and the
//! reads every subcommand shares: a group and its volumes from its ConsistencyGroupShards.

use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
};
use lockstep_api::v1alpha1::{ConsistencyGroup, GroupVolumes};

use crate::{Cli, PluginError};

/// The namespace Lockstep's chart is installed in by the README's commands.
pub const DEFAULT_NAMESPACE: &str = "lockstep";

/// The hub's API server, as the flags name it.
#[derive(Clone)]
pub struct Connection {
    /// The client.
    pub client: Client,
    /// `-n`, else the context's namespace when it names one, else [`DEFAULT_NAMESPACE`].
    pub namespace: String,
}

impl Connection {
    /// Connects as kubectl would with the same flags and environment.
    pub async fn open(cli: &Cli) -> Result<Self, PluginError> {
        let options = KubeConfigOptions {
            context: cli.context.clone(),
            ..KubeConfigOptions::default()
        };
        let refused = |error: kube::config::KubeconfigError| {
            PluginError::Kubeconfig(format!("cannot use the kubeconfig: {error}"))
        };
        let (config, context_namespace) = match &cli.kubeconfig {
            Some(path) => {
                let kubeconfig = Kubeconfig::read_from(path).map_err(refused)?;
                let namespace = context_namespace(&kubeconfig, cli.context.as_deref());
                let config = Config::from_custom_kubeconfig(kubeconfig, &options)
                    .await
                    .map_err(refused)?;
                (config, namespace)
            }
            None => {
                let namespace = Kubeconfig::read()
                    .ok()
                    .and_then(|kubeconfig| context_namespace(&kubeconfig, cli.context.as_deref()));
                (
                    Config::from_kubeconfig(&options).await.map_err(refused)?,
                    namespace,
                )
            }
        };
        let client = Client::try_from(config).map_err(|error| {
            PluginError::Kubeconfig(format!(
                "cannot build a client from the kubeconfig: {error}"
            ))
        })?;
        let namespace = cli
            .namespace
            .clone()
            .or(context_namespace)
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
        Ok(Self { client, namespace })
    }

    /// The ConsistencyGroup `name`.
    pub async fn group(&self, name: &str) -> Result<ConsistencyGroup, PluginError> {
        Api::<ConsistencyGroup>::all(self.client.clone())
            .get_opt(name)
            .await
            .map_err(|error| PluginError::api(format!("reading ConsistencyGroup {name}"), error))?
            .ok_or_else(|| PluginError::NoGroup(name.to_owned()))
    }

    /// The member volumes of `group` as its shards list them.
    pub async fn volumes(&self, group: &ConsistencyGroup) -> Result<GroupVolumes, PluginError> {
        let Some(uid) = group.group_uid() else {
            return Ok(GroupVolumes::default());
        };
        GroupVolumes::read(&self.client, uid)
            .await
            .map_err(|error| {
                PluginError::api(
                    format!(
                        "listing the ConsistencyGroupShards of {}",
                        group.metadata.name.as_deref().unwrap_or_default()
                    ),
                    error,
                )
            })
    }
}

/// The namespace the kubeconfig's context (the named one, else the current one) sets, if any.
fn context_namespace(kubeconfig: &Kubeconfig, context: Option<&str>) -> Option<String> {
    let name = context.or(kubeconfig.current_context.as_deref())?;
    kubeconfig
        .contexts
        .iter()
        .find(|named| named.name == name)
        .and_then(|named| named.context.as_ref())
        .and_then(|context| context.namespace.clone())
}
