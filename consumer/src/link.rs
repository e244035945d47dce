//! [`Link`]: a connection to the broker that is made again after it is lost, so a
//! consumer outlives a broker restart or a network blip.

use std::sync::Arc;

use lanes_protocol::RequestBody;
use lanes_protocol::client::{Client, ClientConfig, ClientError};

#[derive(Debug)]
pub(crate) struct Link {
    broker: String,
    config: ClientConfig,
    client: tokio::sync::Mutex<Option<Arc<Client>>>,
}

impl Link {
    /// A link that connects on its first request.
    pub(crate) fn new(broker: &str, config: ClientConfig) -> Link {
        Link {
            broker: broker.to_owned(),
            config,
            client: tokio::sync::Mutex::new(None),
        }
    }

    /// A link that is connected now: fails at once if the broker is unreachable.
    pub(crate) async fn connect(broker: &str, config: ClientConfig) -> Result<Link, ClientError> {
        let client = Client::connect(broker, config.clone()).await?;
        Ok(Link {
            broker: broker.to_owned(),
            config,
            client: tokio::sync::Mutex::new(Some(Arc::new(client))),
        })
    }

    /// Sends one request, connecting first if needed. A lost connection is dropped, so
    /// the next request connects again; the caller decides whether to retry.
    pub(crate) async fn request<R: RequestBody>(&self, request: &R) -> Result<R::Response, ClientError> {
        let client = self.client().await?;
        self.request_on(&client, request).await
    }

    /// Sends a request that is safe to send twice (a commit, an offset fetch, a leave):
    /// once more, on a new connection, if the connection is lost with it. The commit
    /// connection idles between uses, so the broker may close it
    /// (`connection_idle_ms_max`) just as a request goes out.
    pub(crate) async fn request_idempotent<R: RequestBody>(
        &self,
        request: &R,
    ) -> Result<R::Response, ClientError> {
        match self.request(request).await {
            Err(ClientError::Closed(_)) => self.request(request).await,
            answered => answered,
        }
    }

    /// The connection, made first if there is none or it was lost: its handshake tells
    /// which versions the broker speaks.
    pub(crate) async fn client(&self) -> Result<Arc<Client>, ClientError> {
        let mut slot = self.client.lock().await;
        match slot.as_ref().filter(|c| !c.is_closed()) {
            Some(client) => Ok(Arc::clone(client)),
            None => {
                let client = Arc::new(Client::connect(&self.broker, self.config.clone()).await?);
                *slot = Some(Arc::clone(&client));
                Ok(client)
            }
        }
    }

    /// Sends one request on `client`, from [`Link::client`]; as [`Link::request`].
    pub(crate) async fn request_on<R: RequestBody>(
        &self,
        client: &Arc<Client>,
        request: &R,
    ) -> Result<R::Response, ClientError> {
        let result = client.request(request).await;
        if result.as_ref().is_err_and(ClientError::is_connection_lost) {
            let mut slot = self.client.lock().await;
            if slot.as_ref().is_some_and(|c| Arc::ptr_eq(c, client)) {
                *slot = None;
            }
        }
        result
    }
}
