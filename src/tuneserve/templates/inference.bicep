// tuneserve: serve a base model and its LoRA adapters on Azure Container Apps (GPU).
// Parameters and outputs keep the AI Toolkit's inference template's names; infra/inference.json
// is the same template as ARM JSON (what `tuneserve provision` deploys).

@description('Commands that start the web API, joined with "; " and run by /bin/bash -c. The file share is mounted at /mount.')
param defaultCommands array

@description('The most GPU instances: NC24-A100 nodes in the environment\'s GPU profile. Each replica takes a whole node, so the app runs at most max(1, maximumInstanceCount - 1) replicas and a deploy always has a free node for the new revision; with 1, deploy restarts the replica in place (the endpoint is down until it is ready).')
@minValue(1)
param maximumInstanceCount int = 2

@description('Nodes the GPU workload profile may hold, if more than maximumInstanceCount: tuneserve passes the current count of an existing environment (one shared with fine-tuning) so provisioning never lowers it.')
@minValue(1)
param gpuProfileMaximumCount int = maximumInstanceCount

@description('The endpoint\'s API key (/v1 and the chat UI). Kept as a Container Apps secret; no default, so a deployment by hand asks for it.')
@secure()
param apiKey string

@description('The endpoint\'s admin key (also loads and unloads adapters). Kept as a Container Apps secret; no default.')
@secure()
param adminKey string

@description('Where the resources go; default: the resource group\'s location.')
param location string = resourceGroup().location

@description('Storage account holding the share (default: the fine-tuning step\'s).')
@minLength(3)
@maxLength(24)
param storageAccountName string = 'aistorage${substring(uniqueString(resourceGroup().id), 0, 5)}'

@description('File share mounted at /mount: model-cache/, models/ and the tuneserve build.')
@minLength(3)
@maxLength(63)
param fileShareName string = 'aifileshare${substring(uniqueString(resourceGroup().id), 0, 5)}'

@description('Container Apps environment (default: the fine-tuning step\'s).')
param acaEnvironmentName string = 'aienv${substring(uniqueString(resourceGroup().id), 0, 5)}'

@description('The environment\'s storage entry over the file share.')
param acaEnvironmentStorageName string = 'aienvstorage${substring(uniqueString(resourceGroup().id), 0, 5)}'

@description('The Container App serving the inference API.')
@minLength(2)
@maxLength(32)
param acaAppName string = 'aiacaapp${substring(uniqueString(resourceGroup().id), 0, 5)}'

@description('Log Analytics workspace receiving the environment\'s logs.')
param acaLogAnalyticsName string = 'ailog${substring(uniqueString(resourceGroup().id), 0, 5)}'

var targetPort = 7860
// replicas: one node fewer than the GPU profile holds, so a new revision can start beside the old
var maxReplicas = max(1, maximumInstanceCount - 1)
var command = join(defaultCommands, '; ')
var volumeName = 'share'

resource storageAccount 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: storageAccountName
  location: location
  sku: {
    name: 'Standard_LRS'
  }
  kind: 'StorageV2'
  properties: {
    largeFileSharesState: 'Enabled'
    minimumTlsVersion: 'TLS1_2'
  }
}

resource fileService 'Microsoft.Storage/storageAccounts/fileServices@2023-05-01' = {
  parent: storageAccount
  name: 'default'
  properties: {
    shareDeleteRetentionPolicy: {
      enabled: true
      days: 7
    }
  }
}

resource fileShare 'Microsoft.Storage/storageAccounts/fileServices/shares@2023-05-01' = {
  parent: fileService
  name: fileShareName
  properties: {
    shareQuota: 1024
  }
}

resource logAnalytics 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: acaLogAnalyticsName
  location: location
  properties: {
    sku: {
      name: 'PerGB2018'
    }
  }
}

resource environment 'Microsoft.App/managedEnvironments@2024-03-01' = {
  name: acaEnvironmentName
  location: location
  properties: {
    zoneRedundant: false
    appLogsConfiguration: {
      destination: 'log-analytics'
      logAnalyticsConfiguration: {
        customerId: logAnalytics.properties.customerId
        sharedKey: logAnalytics.listKeys().primarySharedKey
      }
    }
    workloadProfiles: [
      {
        workloadProfileType: 'Consumption'
        name: 'Consumption'
      }
      {
        workloadProfileType: 'NC24-A100'
        name: 'GPU'
        minimumCount: 0
        maximumCount: max(gpuProfileMaximumCount, maximumInstanceCount)
      }
    ]
  }
}

resource envStorage 'Microsoft.App/managedEnvironments/storages@2024-03-01' = {
  parent: environment
  name: acaEnvironmentStorageName
  properties: {
    azureFile: {
      accountName: storageAccount.name
      accountKey: storageAccount.listKeys().keys[0].value
      shareName: fileShare.name
      accessMode: 'ReadWrite'
    }
  }
}

resource acaApp 'Microsoft.App/containerApps@2024-03-01' = {
  name: acaAppName
  location: location
  properties: {
    environmentId: environment.id
    workloadProfileName: 'GPU'
    configuration: {
      activeRevisionsMode: 'Single'
      secrets: [
        {
          name: 'api-key'
          value: apiKey
        }
        {
          name: 'admin-key'
          value: adminKey
        }
      ]
      ingress: {
        external: true
        allowInsecure: false
        targetPort: targetPort
        transport: 'auto'
        traffic: [
          {
            latestRevision: true
            weight: 100
          }
        ]
      }
    }
    template: {
      // on SIGTERM a replica drains running requests for up to tuneserve serve --shutdown-timeout
      // (default 30 s), then exits; Container Apps kills the container this long after SIGTERM:
      // the drain plus 10 s to exit (tuneserve.deploy.infra.TERMINATION_GRACE_S, as the local
      // provider's stop), so a full drain is never cut short
      terminationGracePeriodSeconds: 40
      containers: [
        {
          name: 'inference'
          // torch >= 2.6 and Python >= 3.11, which transformers 5 needs (tuneserve.deploy.infra.CONTAINER_IMAGE)
          image: 'docker.io/pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime'
          command: [
            '/bin/bash'
            '-c'
            command
          ]
          env: [
            {
              name: 'TUNESERVE_MOUNT'
              value: '/mount'
            }
            {
              name: 'GRADIO_ANALYTICS_ENABLED'
              value: 'False'
            }
            {
              name: 'HF_HOME'
              value: '/mount/cache/huggingface'
            }
            {
              name: 'TUNESERVE_API_KEY'
              secretRef: 'api-key'
            }
            {
              name: 'TUNESERVE_ADMIN_KEY'
              secretRef: 'admin-key'
            }
          ]
          resources: {
            cpu: 24
            memory: '220Gi'
          }
          probes: [
            {
              type: 'Startup'
              httpGet: {
                path: '/ready'
                port: targetPort
                scheme: 'HTTP'
              }
              initialDelaySeconds: 30
              periodSeconds: 120
              timeoutSeconds: 5
              failureThreshold: 10
            }
            {
              type: 'Readiness'
              httpGet: {
                path: '/ready'
                port: targetPort
                scheme: 'HTTP'
              }
              periodSeconds: 10
              timeoutSeconds: 5
              successThreshold: 1
              failureThreshold: 3
            }
            {
              type: 'Liveness'
              httpGet: {
                path: '/health'
                port: targetPort
                scheme: 'HTTP'
              }
              periodSeconds: 15
              timeoutSeconds: 5
              failureThreshold: 4
            }
          ]
          volumeMounts: [
            {
              volumeName: volumeName
              mountPath: '/mount'
            }
          ]
        }
      ]
      scale: {
        minReplicas: 1
        maxReplicas: maxReplicas
        rules: [
          {
            name: 'http-concurrency'
            http: {
              metadata: {
                concurrentRequests: '16'
              }
            }
          }
        ]
      }
      volumes: [
        {
          name: volumeName
          storageType: 'AzureFile'
          storageName: envStorage.name
        }
      ]
    }
  }
}

output SUBSCRIPTION_ID string = subscription().subscriptionId
output RESOURCE_GROUP_NAME string = resourceGroup().name
output STORAGE_ACCOUNT_NAME string = storageAccount.name
output FILE_SHARE_NAME string = fileShare.name
output ACA_APP_NAME string = acaApp.name
// the ingress FQDN, as the AI Toolkit's template writes it (https is implied: ingress is HTTPS only)
output ACA_APP_ENDPOINT string = acaApp.properties.configuration.ingress.fqdn
